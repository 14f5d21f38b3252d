//! Wire format: round trips, Caffe2 field numbers, garbage input.

use dpm::prelude::*;
use dpm::proto::{Argument, DeviceOption};
use prost::Message;

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

/// `(field number, wire type)` of each top-level record of protobuf `bytes`,
/// sorted. Wire types: 0 varint, 1 fixed64, 2 length-delimited, 5 fixed32.
fn records(bytes: &[u8]) -> Vec<(u64, u8)> {
    fn varint(b: &[u8], at: &mut usize) -> u64 {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = b[*at];
            *at += 1;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                break;
            }
        }
        v
    }
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let key = varint(bytes, &mut at);
        let wire = (key & 7) as u8;
        match wire {
            0 => {
                varint(bytes, &mut at);
            }
            1 => at += 8,
            2 => at += varint(bytes, &mut at) as usize,
            5 => at += 4,
            w => panic!("wire type {w} is not used by caffe2.proto"),
        }
        out.push((key >> 3, wire));
    }
    out.sort_unstable();
    out
}

/// Expected records: `(field, wire type, how many records)` as caffe2.proto
/// (proto2) declares them, for a message with every field set and two elements
/// in each repeated field. Packed repeated fields are one length-delimited
/// record; unpacked ones one record per element.
fn expect(fields: &[(u64, u8, usize)]) -> Vec<(u64, u8)> {
    let mut v: Vec<(u64, u8)> = fields
        .iter()
        .flat_map(|&(f, w, n)| std::iter::repeat_n((f, w), n))
        .collect();
    v.sort_unstable();
    v
}

fn device_option() -> DeviceOption {
    DeviceOption {
        device_type: Some(1),
        cuda_gpu_id: Some(3),
        random_seed: Some(7),
    }
}

fn argument() -> Argument {
    Argument {
        name: Some("a".into()),
        f: Some(0.5),
        i: Some(-2),
        s: Some(b"s".to_vec()),
        floats: vec![1.0, 2.0],
        ints: vec![3, 4],
        strings: vec![b"x".to_vec(), b"y".to_vec()],
    }
}

fn operator() -> OperatorDef {
    OperatorDef {
        input: vec!["x".into(), "w".into()],
        output: vec!["y".into(), "z".into()],
        name: Some("op".into()),
        r#type: Some("FC".into()),
        arg: vec![argument(), argument()],
        device_option: Some(device_option()),
        engine: Some("CUDNN".into()),
        control_input: vec!["c".into(), "d".into()],
        is_gradient_op: Some(true),
    }
}

#[test]
fn every_field_of_every_message_has_caffe2s_number_and_wire_type() {
    // DeviceOption: device_type = 1, cuda_gpu_id = 2, random_seed = 3 (varints).
    assert_eq!(
        records(&device_option().encode_to_vec()),
        expect(&[(1, 0, 1), (2, 0, 1), (3, 0, 1)])
    );
    // Argument: name = 1, f = 2 (fixed32), i = 3, s = 4, floats = 5 and ints = 6
    // (proto2 repeated scalars: unpacked), strings = 7.
    assert_eq!(
        records(&argument().encode_to_vec()),
        expect(&[
            (1, 2, 1),
            (2, 5, 1),
            (3, 0, 1),
            (4, 2, 1),
            (5, 5, 2),
            (6, 0, 2),
            (7, 2, 2)
        ])
    );
    // OperatorDef: input = 1, output = 2, name = 3, type = 4, arg = 5,
    // device_option = 6, engine = 7, control_input = 8, is_gradient_op = 9.
    assert_eq!(
        records(&operator().encode_to_vec()),
        expect(&[
            (1, 2, 2),
            (2, 2, 2),
            (3, 2, 1),
            (4, 2, 1),
            (5, 2, 2),
            (6, 2, 1),
            (7, 2, 1),
            (8, 2, 2),
            (9, 0, 1)
        ])
    );
    // NetDef: name = 1, op = 2, type = 3, num_workers = 4, device_option = 5,
    // arg = 6, external_input = 7, external_output = 8.
    let net = NetDef {
        name: Some("n".into()),
        op: vec![operator(), operator()],
        r#type: Some("dag".into()),
        num_workers: Some(4),
        device_option: Some(device_option()),
        arg: vec![argument(), argument()],
        external_input: vec!["a".into(), "b".into()],
        external_output: vec!["c".into(), "d".into()],
    };
    assert_eq!(
        records(&net.encode_to_vec()),
        expect(&[
            (1, 2, 1),
            (2, 2, 2),
            (3, 2, 1),
            (4, 0, 1),
            (5, 2, 1),
            (6, 2, 2),
            (7, 2, 2),
            (8, 2, 2)
        ])
    );
    // TensorProto: dims = 1 (unpacked), data_type = 2, float_data = 3,
    // int32_data = 4 (packed), byte_data = 5, string_data = 6, name = 7,
    // device_detail = 8, double_data = 9, int64_data = 10 (packed).
    let tensor = TensorProto {
        dims: vec![2, 1],
        data_type: Some(1),
        float_data: vec![1.0, 2.0],
        int32_data: vec![1, 2],
        byte_data: Some(vec![1, 2]),
        string_data: vec![b"p".to_vec(), b"q".to_vec()],
        name: Some("t".into()),
        device_detail: Some(device_option()),
        double_data: vec![1.0, 2.0],
        int64_data: vec![1, 2],
    };
    assert_eq!(
        records(&tensor.encode_to_vec()),
        expect(&[
            (1, 0, 2),
            (2, 0, 1),
            (3, 2, 1),
            (4, 2, 1),
            (5, 2, 1),
            (6, 2, 2),
            (7, 2, 1),
            (8, 2, 1),
            (9, 2, 1),
            (10, 2, 1)
        ])
    );
    // TensorProtos: protos = 1.
    let protos = TensorProtos {
        protos: vec![tensor.clone(), tensor],
    };
    assert_eq!(records(&protos.encode_to_vec()), expect(&[(1, 2, 2)]));
    // The data types' numbers.
    use dpm::proto::TensorDataType as T;
    let numbers = [
        (T::Undefined, 0),
        (T::Float, 1),
        (T::Int32, 2),
        (T::Byte, 3),
        (T::String, 4),
        (T::Bool, 5),
        (T::Uint8, 6),
        (T::Int8, 7),
        (T::Uint16, 8),
        (T::Int16, 9),
        (T::Int64, 10),
        (T::Float16, 12),
        (T::Double, 13),
    ];
    for (t, n) in numbers {
        assert_eq!(t as i32, n, "{t:?}");
    }
}

#[test]
fn fields_caffe2_has_and_dpm_does_not_are_skipped() {
    // OperatorDef.debug_info = 10 and NetDef.profile = 9 (a Profile with a
    // target = 4), as a newer Caffe2 writes them, around fields dpm reads.
    let mut op = OperatorDef {
        r#type: Some("Relu".into()),
        ..Default::default()
    }
    .encode_to_vec();
    op.extend([0x52, 3, b'd', b'b', b'g']);
    let op = OperatorDef::from_bytes(&op).unwrap();
    assert_eq!(op.op_type(), "Relu");
    let mut net = vec![0x4a, 3, 0x22, 1, b'x'];
    net.extend(
        NetDef {
            name: Some("n".into()),
            op: vec![op.clone()],
            ..Default::default()
        }
        .encode_to_vec(),
    );
    let net = NetDef::from_bytes(&net).unwrap();
    assert_eq!((net.net_name(), &net.op[..]), ("n", &[op][..]));
}

#[test]
fn argument_and_name_lookups() {
    let mut op = operator();
    op.arg[1].name = Some("b".into());
    op.arg[1].i = Some(9);
    assert_eq!(op.find_arg("b").and_then(|a| a.i), Some(9));
    assert_eq!(op.find_arg("a").and_then(|a| a.i), Some(-2));
    assert!(op.find_arg("c").is_none());
    assert_eq!(OperatorDef::default().op_type(), "");
    let net = NetDef {
        arg: vec![argument()],
        ..Default::default()
    };
    assert_eq!(net.find_arg("a").and_then(|a| a.f), Some(0.5));
    assert!(net.find_arg("b").is_none());
    assert_eq!(net.net_name(), "");
    // Decoding errors name the message that failed.
    let err = OperatorDef::from_bytes(&[0x0a, 0x09]).unwrap_err().to_string();
    assert!(err.contains("OperatorDef"), "{err}");
    let err = TensorProto::from_bytes(&[0x0a, 0x09]).unwrap_err().to_string();
    assert!(err.contains("TensorProto"), "{err}");
}
