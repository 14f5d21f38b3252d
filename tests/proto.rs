//! Wire format: round trips, Caffe2 field numbers, garbage input.

use dpm::prelude::*;
use dpm::proto::{Argument, DeviceOption};

#[test]
fn netdef_round_trips_through_bytes() {
    let mut net = Net::new("train");
    net.set_type("dag")
        .set_num_workers(8)
        .set_arg("first_iter_only_one_worker", 1i64);
    net.device_scope(Device::cuda(1), |net| {
        net.name_scope("gpu_1", |net| {
            net.op("FC")
                .inputs(["x", "w", "b"])
                .output("y")
                .arg("axis", 1i64)
                .engine("CUDNN")
                .build();
            net.op("Scale")
                .input("y")
                .output("z")
                .arg("scale", 0.5f32)
                .control_input("y")
                .name("scale")
                .build();
            net.op("Foo")
                .output("q")
                .arg("ints", vec![1i64, 2])
                .arg("floats", vec![0.5f32])
                .arg("s", "str")
                .build();
        })
    });
    net.add_external_input("data");
    let def = net.proto();
    assert_eq!(def.op[0].input, ["gpu_1/x", "gpu_1/w", "gpu_1/b"]);
    assert_eq!(def.op[0].device_option.as_ref().unwrap().cuda_gpu_id, Some(1));
    let bytes = def.to_bytes();
    assert_eq!(&NetDef::from_bytes(&bytes).unwrap(), def);
}

#[test]
fn field_numbers_match_caffe2() {
    // OperatorDef{type: "FC"}: field 4, length-delimited → tag byte 0x22.
    let op = OperatorDef {
        r#type: Some("FC".into()),
        ..Default::default()
    };
    assert_eq!(op.to_bytes(), [0x22, 2, b'F', b'C']);
    // NetDef{num_workers: 3}: field 4, varint → 0x20.
    let net = NetDef {
        num_workers: Some(3),
        ..Default::default()
    };
    assert_eq!(net.to_bytes(), [0x20, 3]);
    // DeviceOption{device_type: 1, cuda_gpu_id: 2}.
    let d = DeviceOption {
        device_type: Some(1),
        cuda_gpu_id: Some(2),
        random_seed: None,
    };
    assert_eq!(prost::Message::encode_to_vec(&d), [0x08, 1, 0x10, 2]);
    // Argument{name: "a", i: 5}: name = 1, i = 3.
    let a = Argument {
        name: Some("a".into()),
        i: Some(5),
        ..Default::default()
    };
    assert_eq!(prost::Message::encode_to_vec(&a), [0x0a, 1, b'a', 0x18, 5]);
    // TensorProto float_data is packed (field 3, wire type 2).
    let t = Tensor::from_vec([1], vec![1.0f32]).unwrap().to_proto("t");
    let b = t.to_bytes();
    assert_eq!(&b[..4], [0x08, 1, 0x10, 1]); // dims=[1], data_type=FLOAT
    assert_eq!(&b[4..6], [0x1a, 4]);
}

#[test]
fn tensor_protos_round_trip() {
    let a = Tensor::from_vec([2, 2], vec![1.0f32, -2.0, 3.5, f32::MIN_POSITIVE]).unwrap();
    let b = Tensor::from_vec([3], vec![1i64, -7, i64::MAX]).unwrap();
    let c = Tensor::from_vec([2], vec![4i32, 5]).unwrap();
    let protos = TensorProtos {
        protos: vec![a.to_proto("a"), b.to_proto("b"), c.to_proto("c")],
    };
    let back = TensorProtos::from_bytes(&protos.to_bytes()).unwrap();
    assert_eq!(back, protos);
    for (p, t) in back.protos.iter().zip([&a, &b, &c]) {
        assert!(Tensor::from_proto(p).unwrap().bitwise_eq(t));
    }
}

#[test]
fn garbage_bytes_are_an_error_not_a_panic() {
    let mut seed = 0x1234_5678u64;
    for len in 0..2000 {
        let bytes: Vec<u8> = (0..len % 97)
            .map(|_| {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (seed >> 56) as u8
            })
            .collect();
        let _ = NetDef::from_bytes(&bytes);
        let _ = TensorProtos::from_bytes(&bytes);
    }
    assert!(matches!(
        NetDef::from_bytes(&[0x12, 0xff, 0x01]),
        Err(Error::Decode { .. })
    ));
    assert!(TensorProtos::from_bytes(&[0x0a, 0x05, 0x08]).is_err());
    // Well-formed protobuf whose data disagree with its dims.
    let bad = TensorProto {
        dims: vec![2, 2],
        float_data: vec![1.0],
        ..Default::default()
    };
    assert!(Tensor::from_proto(&bad).is_err());
}
